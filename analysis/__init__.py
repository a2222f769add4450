"""tokenscope's analysis layer: models, the reduction engine, methods and measures. Never imports Streamlit."""
