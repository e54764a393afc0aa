"""Evaluation of trained policies against their reference.

evaluate.py      `python -m qrpo.evaluate`: sample, score, compare; JSON, Markdown and plots
metrics.py       win rates, length-controlled reward, KL estimates, Spearman, pass@k
plots.py         reward-vs-KL, bars, length histograms
frontier_report.py  the table (Markdown, JSON, CSV) and plot of `python -m qrpo.pipelines.frontier`
"""
