"""Data layer: FashionMNIST, image decoding and conversion, corpus sources, the demo corpus.

Import the submodules directly (``gradood.data.sources`` ...): keeping this file empty keeps
``python -m gradood.data.fashion_mnist`` clean and light imports light.
"""
