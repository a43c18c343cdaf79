"""Retrieval beside the adapter: `honed index` builds a BM25 index over a domain corpus (index.py); serving and
eval search it and put the passages into the prompt (search.py)."""

from honed.retrieval.search import IndexNotFound, RetrievalIndex, fill_template, index_exists, source_list

__all__ = ["IndexNotFound", "RetrievalIndex", "fill_template", "index_exists", "source_list"]
