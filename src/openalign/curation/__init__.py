"""Data curation that needs a model: similarity scores, selection by score, semantic deduplication, and the
bootstrap that trains its own scorer (rules -> short run -> scores -> keep -> train again).

It sits above `inference/` (scoring embeds through the same encoders as `openalign embed`) and `train/` (the
bootstrap trains); `data/` holds the rules, which need no model. See docs/curation.md.
"""
