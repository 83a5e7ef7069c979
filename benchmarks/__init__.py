"""What a user runs to reproduce a figure of README.md or docs/BENCHMARKS.md. From the repository
root, in the project's environment (each prints its figures and asserts nothing):

    python -m benchmarks.training throughput        training steps: img/s, GFLOP/s against this machine's kernel peaks
    python -m benchmarks.training pipeline          the data module's cost: an epoch fed by it vs in-memory batches
    python -m benchmarks.training time-to-accuracy --out docs/benchmark   accuracy against wall time, every preset
    python -m benchmarks.training step --recipes 94 one training step: its time, where it goes, its convolutions alone
    python -m benchmarks.training all --out docs/benchmark      (throughput, pipeline and time-to-accuracy)
    python -m benchmarks.training replot --out docs/benchmark   redraw time_to_accuracy.png from its CSV
    python -m benchmarks.inference CKPT             eager PyTorch vs TorchScript vs onnxruntime, images/s
    python -m benchmarks.serve MODEL                cifar-serve under load, batching off and on, vs in-process
    python -m benchmarks.startup                    the commands' start-up time vs `import lightning`
    python -m benchmarks.keras --data-dir D         the notebook's Keras system side by side with --preset seed
    python -m benchmarks.trust --data-dir D --out O calibration and corruption robustness of recipes, over seeds
    python -m benchmarks.augment_cost               what each augmentation costs per epoch vs the training step

All of them share ``benchmarks.harness``: the machine's description, the precision it trains in,
the conv reference rate in that precision, timing and normalisation. This package's top level
imports nothing (the Keras benchmark's TensorFlow child must not import torch).
"""
