# Sourced by the lent-GPU scripts (gpu_trust.sh, gpu_speed.sh, gpu_presets.sh): their environment and data, in two
# calls (../shared/docs/GPU.md). "unpack PART" (call 1) unpacks the first part, prints the versions there and exits;
# any other first argument (call 2) unpacks part 2 into $D and checks the image counts. Run from the repository root.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
D=$PWD/.gpu-cifar
if [ "$1" = unpack ]; then
    python3 -m research.gpu_data unpack "$2" --out "$D"
    python3 -c "import torch, torchvision, lightning, cifar_lightning.training, cifar_lightning.evaluate; print(torch.__version__, torchvision.__version__, lightning.__version__, torch.cuda.get_device_name(), 'Muon:', hasattr(torch.optim, 'Muon'))"
    exit
fi
python3 -m research.gpu_data unpack .gpu-data/part2.npz --out "$D" || exit 1
python3 -c "from cifar_lightning.data import load_splits; s = load_splits('$D', download=False); print({k: len(v.labels) for k, v in s.items()})" || exit 1
