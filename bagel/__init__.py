"""bagel: our own PyTorch implementation of BAGEL-7B-MoT inference.

Usable as a library without the job service: ``Engine.load(path)`` then ``engine.run([...])``.

Shape legend used in every module of this package:
    B  batch (requests)            L  sequence length (packed tokens)
    H  attention heads             D  head dimension
    C  channels                    h×w  latent grid (in 2×2 latent patches)
    N  number of ViT patches       P  flattened patch (3·14·14 = 588)
"""
