"""Matcher stage: Milvus candidates, verified by SIFT matching (FAISS) and a geometric check."""
