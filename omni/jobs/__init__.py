"""Batch jobs over many media files, built on the streaming engine (`omni caption`)."""
