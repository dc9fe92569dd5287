"""`synthbreast report`: collect every run's result files into one Markdown/HTML/CSV report.

collect.py reads the files, svg.py draws line plots, render.py writes the report.
"""
