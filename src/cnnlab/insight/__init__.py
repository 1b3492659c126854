"""Insight: the HTML report, its figures, Grad-CAM heat maps and dataset previews.
"""
