"""The Gradio web demo (issue: Gradio web demo)."""
