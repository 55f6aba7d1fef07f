"""The run report: assembled data (data.py), report.json validation and the Markdown/HTML/plot views."""
