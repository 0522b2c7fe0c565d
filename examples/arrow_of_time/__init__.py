"""The arrow-of-time study: does a video SparseFormer tell a clip played forwards from one
played backwards? A research experiment on the library, not part of the installed package."""
