"""Clusterer stage: the graph of verified matches, communities with stable ids, exports."""
