"""A synthetic world of coloured shapes where Custom Diffusion's claims are measured with ground truth.

`world` (attributes, scenes, captions, concepts), `render` (scenes to images), `metrics` (images back to
scenes), `pretrain` (the tiny base), `eval` (the variants and the table). See docs/toyworld.md.
"""
