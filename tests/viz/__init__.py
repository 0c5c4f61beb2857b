"""Tests of the dashboard (raypipe.viz): API, scores, Parquet overview, headless browser."""
