"""Integrations of distq with other libraries (each imports its library on use).

* :mod:`distq.integrations.gensim`: product-quantised gensim ``KeyedVectors`` and fastText models
  (``most_similar``, ``similarity`` and out-of-vocabulary vectors on the compressed model).
"""
