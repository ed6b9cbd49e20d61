"""Closed-form multi-concept merge and truncated-SVD compression of concept deltas (pure tensor math).

`merger.merge` and `merger.compress` are tensor -> tensor; `merger.features` computes the token features
the merge needs from a base text encoder; `merger.run` is the thin wrapper from and to `Concept`s.
"""
