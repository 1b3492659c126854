"""The docs test's harness: the fenced code blocks of a Markdown file, parsed, checked and run.

tests/test_docs.py runs README.md and the tutorials through it, so a command or snippet in the
docs that stops working fails the suite. The docs mark their blocks this way:

Every fence has a language (a fence without one is an error naming its line):
- bash: shell commands, run one line at a time (`\\` continues a line, `#` starts a comment);
- python: Python, run with the workspace as the current folder, each block in a fresh namespace;
- text: program output, folder layouts, anything shown and never run;
- yaml (or another language): shown, not run, unless a `file` directive writes it to a file.

Optional directives go in ONE HTML comment on the line right before the fence:
    <!-- test: DIRECTIVE; DIRECTIVE ... -->
- skip REASON: not run; REASON becomes the pytest skip reason (e.g. "needs a second machine");
- file PATH: write the block's text to PATH in the workspace instead of running it;
- shorten FLAGS: append FLAGS to every `cnnlab train` / `cnnlab lr-find` command of the block
  (the test's id ends in -shortened, and its output shows each command as run);
- replace OLD=>NEW: replace text before running (placeholders such as RUN_DIR); may repeat;
- exit N: the block's last command must exit with status N (every command: 0 by default);
- server RUN: `cnnlab serve RUN` runs during the block, and 127.0.0.1:8000 in the block is
  rewritten to its address (it listens on a free loopback port);
- synopsis: a usage summary, not run: every --flag of a `cnnlab CMD` line must be a flag of
  CMD's parser, and a `python -m benchmarks ...` line must parse with the benchmarks' parser.

Blocks of one file run in order in one workspace (the current folder), so a later block may use
what an earlier one wrote. Python blocks share nothing but the files on disk. A bash line runs:
- in this process through `cnnlab.cli.main(argv)` when it is a plain `cnnlab ...` command (no
  pipe, redirection, `$`, `;`...; globs are expanded as bash would): torch is imported once;
- `cnnlab serve ...` as a server process: started, awaited until /healthz answers, stopped with
  SIGTERM, and its exit status must be 0;
- `A && B` where both are plain cnnlab commands: one after the other, as bash would;
- anything else through `bash -c`, with this virtualenv's bin/ first on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DIRECTIVES = ("skip", "file", "shorten", "replace", "exit", "server", "synopsis")
RUN_LANGUAGES = ("bash", "python")
COMMAND_TIMEOUT = 600  # seconds for one bash line
SERVE_TIMEOUT = 120  # seconds for `cnnlab serve` to answer /healthz: it imports torch and exports the model first
OUTPUT_SHOWN = 6000  # characters of a failed command's output in the failure message

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*test:(?P<body>.*?)-->\s*$")
_SHELL_SYNTAX = re.compile(r"[|&;<>()$`]")  # what only bash can run (globs and quotes are handled here)
_TRAINING = re.compile(r"\bcnnlab (train|lr-find)\b")
_FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


class DocsError(Exception):
    """The Markdown's marking is wrong (as opposed to a command in it failing)."""


@dataclass(frozen=True)
class Block:
    source: Path  # the Markdown file
    doc: str  # its name as the test ids show it: README.md, docs/tutorial.md
    line: int  # the opening fence's line, from 1
    lang: str  # "" when the fence has none
    text: str
    directives: tuple[tuple[str, str], ...] = ()
    problem: str = ""  # what is wrong with the block's marking

    def get(self, name: str) -> str | None:
        """The first `name` directive's argument ("" for synopsis), None without one."""
        return next((arg for key, arg in self.directives if key == name), None)

    def all(self, name: str) -> list[str]:
        return [arg for key, arg in self.directives if key == name]

    @property
    def id(self) -> str:
        shortened = "-shortened" if self.get("shorten") is not None else ""
        return f"{self.doc}:{self.line}-{self.lang or 'no-language'}{shortened}"

    @property
    def acted_on(self) -> bool:
        """Run, written, checked or skipped: every block but plain text, yaml and the like."""
        return self.lang in RUN_LANGUAGES or bool(self.directives) or bool(self.problem)


# ------------------------------------------------------------------------------------ parsing

def parse(path: Path, doc: str | None = None) -> list[Block]:
    """Every fenced block of a Markdown file, in order; a stray directive comment is a DocsError."""
    doc = doc or path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, used, i = [], set(), 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if _closes(lines[j], fence["fence"])), len(lines))
        indent = len(fence["indent"])
        text = "\n".join(line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[i + 1:end])
        lang = fence["info"].split()[0] if fence["info"] else ""
        directives, problem = (), ""
        if i and (comment := _DIRECTIVE.match(lines[i - 1])):
            used.add(i - 1)
            try:
                directives = _directives(comment["body"])
            except DocsError as exc:
                problem = f"{doc}:{i}: {exc}"
        if not lang:
            problem = (f"{doc}:{i + 1}: a fence without a language: write ```bash, ```python or ```text "
                       "(see tests/mddocs.py)")
        blocks.append(Block(path, doc, i + 1, lang, text, directives, problem))
        i = end + 1
    stray = [n + 1 for n, line in enumerate(lines) if _DIRECTIVE.match(line) and n not in used]
    if stray:
        raise DocsError(f"{doc}:{stray[0]}: a `<!-- test: ... -->` comment must be on the line right before a fence")
    return blocks


def _closes(line: str, fence: str) -> bool:
    s = line.strip()
    return len(s) >= len(fence) and set(s) == {fence[0]}


def _directives(body: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in filter(None, (p.strip() for p in body.split(";"))):
        name, _, arg = part.partition(" ")
        arg = arg.strip()
        if name not in DIRECTIVES:
            raise DocsError(f"unknown test directive {name!r} (known: {', '.join(DIRECTIVES)})")
        if (name == "synopsis") == bool(arg):
            raise DocsError(f"`{name}` takes no argument" if arg else f"`{name}` needs an argument")
        if name == "replace" and "=>" not in arg:
            raise DocsError(f"`replace` takes OLD=>NEW, got {arg!r}")
        if name == "exit" and not arg.isdigit():
            raise DocsError(f"`exit` takes a status number, got {arg!r}")
        out.append((name, arg))
    return tuple(out)


def strip_comment(line: str) -> str:
    """A shell line without its `# comment` (a # inside quotes or a word stays)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_lines(text: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1]
            continue
        line = strip_comment(pending + raw).strip()
        pending = ""
        if line:
            out.append(line)
    return out


def without_comments(block: Block) -> str:
    """The block's code with comments and blank lines removed (translations may differ only there)."""
    lines = block.text.splitlines()
    if block.lang == "python":
        try:
            for token in tokenize.generate_tokens(io.StringIO(block.text).readline):
                if token.type == tokenize.COMMENT:
                    row, col = token.start
                    lines[row - 1] = lines[row - 1][:col]
        except (tokenize.TokenError, SyntaxError):
            lines = [strip_comment(line) for line in lines]
    else:
        lines = [strip_comment(line) for line in lines]
    return "\n".join(line.rstrip() for line in lines if line.strip())


# ------------------------------------------------------------------------------------ running

def run_block(block: Block, cwd: Path) -> None:
    """Act on one block in the workspace `cwd` (the environment is the caller's: os.environ).
    A failing command raises AssertionError with its output; a wrongly marked block, DocsError."""
    text = block.text
    for pair in block.all("replace"):
        old, _, new = pair.partition("=>")
        if old not in text:
            raise DocsError(f"{block.id}: replace: {old!r} is not in the block")
        text = text.replace(old, new)
    if (path := block.get("file")) is not None:
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).write_text(text + "\n", encoding="utf-8")
        return
    if block.get("synopsis") is not None:
        check_synopsis(text, block.id)
        return
    if block.lang not in RUN_LANGUAGES:
        raise DocsError(f"{block.id}: {block.lang} blocks are not run: give it a `file PATH` directive, or make it text")
    if block.lang != "bash" and (block.get("shorten") or block.get("exit")):
        raise DocsError(f"{block.id}: `shorten` and `exit` apply to bash blocks (use `replace` in Python)")
    with contextlib.ExitStack() as stack:
        if (run := block.get("server")) is not None:
            address = stack.enter_context(served([run], cwd))[0]
            text = text.replace("127.0.0.1:8000", address).replace("localhost:8000", address)
        if block.lang == "python":
            run_python(text, block, cwd)
        else:
            run_shell(text, block, cwd)


def run_python(text: str, block: Block, cwd: Path) -> None:
    """exec() in a fresh namespace, as `python` started in `cwd` would run it; a traceback shows
    the Markdown file's own line numbers."""
    code = compile("\n" * block.line + text, str(block.source), "exec")
    with _in_workspace(cwd, importable=True):
        exec(code, {"__name__": "__main__"})


def run_shell(text: str, block: Block, cwd: Path) -> None:
    lines = shell_lines(text)
    if (flags := block.get("shorten")) is not None:
        if not any(_TRAINING.search(line) for line in lines):
            raise DocsError(f"{block.id}: shorten: the block has no `cnnlab train` or `cnnlab lr-find` command")
        print(f"shortened: `{flags}` appended to every cnnlab train / lr-find command")
        lines = [shorten(line, flags) for line in lines]
    for n, line in enumerate(lines, 1):
        expected = int(block.get("exit") or 0) if n == len(lines) else 0
        start = time.monotonic()
        status, output = run_line(line, cwd)
        print(f"$ {line}\n{output}[exit status {status} after {time.monotonic() - start:.1f} s]")
        if status != expected:
            raise AssertionError(f"{block.id}: `{line}` exited with status {status}, expected {expected}; "
                                 f"its output ends:\n{output[-OUTPUT_SHOWN:]}")


def shorten(line: str, flags: str) -> str:
    """`flags` appended to each `cnnlab train` / `lr-find` command of the line (later flags win)."""
    return " && ".join(f"{part} {flags}" if _TRAINING.search(part) else part for part in _and_parts(line))


def run_line(line: str, cwd: Path) -> tuple[int, str]:
    """One command line: its exit status and output (stdout and stderr together)."""
    argvs = [plain_cnnlab(part) for part in _and_parts(line)]
    if not all(argv is not None for argv in argvs):
        proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT)
        return proc.returncode, proc.stdout
    outputs = []
    for argv in argvs:
        status, output = serve_and_stop(argv[1:], cwd) if argv[:1] == ["serve"] else run_cnnlab(argv, cwd)
        outputs.append(output)
        if status:
            break
    return status, "".join(outputs)


def _and_parts(line: str) -> list[str]:
    """The line split at each `&&` outside quotes."""
    parts, quote, start = [], None, 0
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i) and i >= start:
            parts.append(line[start:i].strip())
            start = i + 2
    return parts + [line[start:].strip()]


def plain_cnnlab(command: str) -> list[str] | None:
    """The arguments after `cnnlab` when the command needs no shell, else None."""
    if _SHELL_SYNTAX.search(command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or words[0] != "cnnlab" or any(w.startswith("~") for w in words):
        return None
    return words[1:]


def run_cnnlab(argv: list[str], cwd: Path) -> tuple[int, str]:
    """`cnnlab ARGV` in this process, in `cwd`, with globs expanded as bash expands them."""
    from cnnlab.cli import main

    expanded = [match for arg in argv for match in (sorted(glob.glob(arg, root_dir=cwd)) or [arg])]
    output = io.StringIO()
    with _in_workspace(cwd), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            status = main(expanded)
        except SystemExit as exc:  # argparse's usage errors and --help
            status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return status, output.getvalue()


def serve_and_stop(args: list[str], cwd: Path) -> tuple[int, str]:
    """`cnnlab serve ARGS` started until /healthz answers, then stopped with SIGTERM."""
    with served(args, cwd) as (address, log):
        output = log.read_text()
    return 0, f"{output}(answered /healthz at {address}; stopped with SIGTERM: exit status 0)\n"


@contextlib.contextmanager
def served(args: list[str], cwd: Path) -> Iterator[tuple[str, Path]]:
    """`cnnlab serve ARGS` on a free loopback port while the block runs: yields (HOST:PORT, its log).
    On leaving, SIGTERM; an exit status other than 0 then fails."""
    from benchmarks.deploy import server_url

    with tempfile.TemporaryDirectory(prefix="docs-serve-") as tmp:
        log = Path(tmp) / "serve.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", *args, "--port", "0"], cwd=cwd,
                                    env=environment(), stdout=out, stderr=subprocess.STDOUT)
        try:
            url = server_url(proc, log, SERVE_TIMEOUT)
            _wait_healthy(url, proc, log)
            yield url.removeprefix("http://"), log
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            raise AssertionError(f"`cnnlab serve {' '.join(args)}` exited with status {proc.returncode} "
                                 f"after SIGTERM:\n{log.read_text()[-OUTPUT_SHOWN:]}")


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url}/healthz did not answer within {SERVE_TIMEOUT} s:\n{log.read_text()[-OUTPUT_SHOWN:]}")


def environment() -> dict[str, str]:
    """os.environ with this virtualenv's bin/ first on PATH (cnnlab, torchrun, python, tensorboard)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@contextlib.contextmanager
def _in_workspace(cwd: Path, importable: bool = False) -> Iterator[None]:
    """cwd as the current folder (and with `importable`, first on sys.path, as for `python` started
    there); afterwards the environment is restored, and modules imported from cwd are forgotten, so
    the next block imports them afresh."""
    before, environ = set(sys.modules), dict(os.environ)
    if importable:
        sys.path.insert(0, str(cwd))
    try:
        with contextlib.chdir(cwd):
            yield
    finally:
        if importable:
            sys.path.remove(str(cwd))
        os.environ.clear()  # as a process's end would (`train --nproc` sets launcher variables here)
        os.environ.update(environ)
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if Path(origin).resolve().is_relative_to(cwd.resolve()):
                del sys.modules[name]


# ------------------------------------------------------------------------------------ synopses

def check_synopsis(text: str, where: str) -> None:
    """Every --flag of each `cnnlab CMD ...` line is one of CMD's flags; each `python -m benchmarks`
    line parses with the benchmarks' own parser. Other lines (tar, mkdir, ...) are not checked."""
    from cnnlab.cli import build_parser

    problems, checked = [], 0
    for line in shell_lines(text):
        words = line.split()
        if "cnnlab" in words:
            checked += 1
            rest = words[words.index("cnnlab") + 1:]
            try:
                parser, used = _subparser(build_parser(), rest)
            except KeyError as exc:
                problems.append(f"`{line}`: cnnlab has no subcommand {exc}")
                continue
            known = {flag for action in parser._actions for flag in action.option_strings}
            problems += [f"`{line}`: {flag} is not a flag of `{parser.prog}`"
                         for flag in _FLAG.findall(" ".join(rest[used:])) if flag not in known]
        elif words[:3] == ["python", "-m", "benchmarks"]:
            from benchmarks.training import build_parser as benchmarks_parser

            checked += 1
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    benchmarks_parser().parse_args(shlex.split(line)[3:])
            except SystemExit:
                problems.append(f"`{line}`: {errors.getvalue().strip().splitlines()[-1]}")
    if not checked:
        raise DocsError(f"{where}: a synopsis without a `cnnlab` or `python -m benchmarks` line")
    if problems:
        raise AssertionError(f"{where}:\n" + "\n".join(problems))


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, int]:
    """The parser of the (sub)subcommand `words` start with, and how many words named it."""
    used = 0
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or used == len(words) or words[used] not in subs[0].choices:
            if used == 0:
                raise KeyError(words[0] if words else "(none given)")
            return parser, used
        parser, used = subs[0].choices[words[used]], used + 1
