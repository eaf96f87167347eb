"""AWQ Explorer engine: exact AWQ maths, streaming statistics, parquet cache. No streamlit here."""
