"""Streamlit helpers shared by app.py and the pages in pages/: cached resources and common widgets.
Only the app imports this package; analysis/ and viz/ never do."""
