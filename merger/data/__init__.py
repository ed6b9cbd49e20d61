"""Data files of the merger: the default regularization captions and the script that writes them."""
