"""What the learned methods share, split as deepinv splits it: data, networks, losses, fitting, weights.

- :mod:`.counts`: the measured counts as a method uses them (binomial splits, hold-out, scatter).
- :mod:`.inputs`: images a network starts from or sees (short OSEM, the back projection, the CT).
- :mod:`.networks`: one U-Net factory with its heads, the padding to its stride and the scale.
- :mod:`.losses`: Poisson likelihood, held-out likelihood, regression, NRMSE.
- :mod:`.fitting`: one optimisation loop with one early-stopping object, and the seeding.
- :mod:`.weights`: one file format for every network that is shipped or written.

A method file builds its input, its network and its loss from these and hands them to :func:`.fitting.fit`.
"""
