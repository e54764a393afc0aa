"""Evaluation of trained policies against their reference.

evaluate.py      `python -m evaluate`: sample, score, compare; JSON, Markdown and plots
metrics.py       win rates, length-controlled reward, KL estimates, Spearman, pass@k
plots.py         reward-vs-KL, bars, length histograms
frontier.py      `python -m evaluate.frontier`: reward-KL frontiers over beta grids and seeds
frontier_report.py  the frontier's table (Markdown, JSON, CSV) and plot
"""
