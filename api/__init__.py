"""The query API (``memetrace serve``): search by image, look up images and clusters, a gallery page.

It reads what ``memetrace index`` and the streaming services stored under the same settings
(Milvus and the feature store), never the SQLite catalog, so any number of replicas can serve.
"""
