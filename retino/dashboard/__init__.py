"""What the pages show, without Streamlit: run cards and labels, charts, estimates, background trainers,
settings, escaping user text, the HTML report and the downloads."""
