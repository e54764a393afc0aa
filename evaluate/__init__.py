"""Evaluation of trained policies against their reference.

evaluate.py      `python -m evaluate`: sample, score, compare; JSON, Markdown and plots
metrics.py       win rates, length-controlled reward, KL estimates, Spearman, pass@k
rewards.py       scorers: the embedded task, a reward model, code tests
code_reward.py   code problems: one sandboxed test per assert, reward = fraction passed
sandbox.py       isolated execution of untrusted code: configuration and one run per test
sandbox_result.py     the run's result channel read into a verdict
sandbox_processes.py  finding and ending a run's processes
sandbox_launcher.py   child side: namespaces, mounts, PID-1 init (standard library, run as source)
sandbox_runner.py     child side: the hardened interpreter that runs one test
plots.py         reward-vs-KL, bars, length histograms
frontier_report.py  the table (Markdown, JSON, CSV) and plot of `python -m pipelines.frontier`
"""
