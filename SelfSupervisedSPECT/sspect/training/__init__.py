"""Networks trained before a scan is seen: supervised training, DL-BPF pretraining, and the datasets they read.

- :mod:`.dataset`: ``sspect dataset``, simulated torso cases with their truth and a manifest;
- :mod:`.supervised`: ``sspect train``, post-unet and unrolled-mapem from a dataset (validation, resume, DDP);
- :mod:`.dl_bpf`: ``sspect pretrain``, one DL-BPF network over many simulated scans, without their truth.
"""
