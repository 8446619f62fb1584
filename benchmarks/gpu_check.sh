#!/usr/bin/env bash
# The GPU check of issue 15, as one script for the GPU machine (../shared/device/README.md): records/s end to
# end of the fused cascade, the staged cascade and Lite2 alone on 10k+ records, with nvJPEG decoding.
#
# Prepare here, from the project root (the carried files must stay under 64 MB in all):
#   bash ../shared/device/fetch_wheels.sh                                 # Beam's wheels -> .whl/ (~37 MB)
#   .venv/bin/pip download --no-deps -d .whl efficientnet-lite-pytorch    # the architectures' code (no weights)
#   mkdir -p .data/sample/images && head -101 ../shared/data/imagenet-sample/labels.csv > .data/sample/labels.csv
#   tail -n +2 .data/sample/labels.csv | cut -d, -f1 | xargs -I{} cp ../shared/data/imagenet-sample/{} .data/sample/images/
# then run it there with carry [".whl", ".data"]:  bash benchmarks/gpu_check.sh   (figures land in $OUT)
#
# The ImageNet weights do not fit in what travels, and speed does not depend on the weights' values, only on
# how many records each stage lets exit: the models get random weights (made there), and the thresholds are
# set from those models' confidences on the carried images so that the stages exit the shares the calibrated
# lite_cascade exits on the sample (94.0 % / 2.8 % / 3.2 %).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" .data/weights
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl .whl/*.tar.gz
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

python3 - <<'PY' | tee "$OUT/config.txt"
import csv, os
import numpy as np, torch
from models import committee, inference, registry
from models.preprocess import decode_target, load_image

torch.manual_seed(0)
keys = [("l0", 0, 224), ("l1", 1, 240), ("l2", 2, 260)]
specs = []
for name, index, res in keys:
    spec = registry.ModelSpec(name=name, arch=f"efficientnet-lite:{index}", weights=f".data/weights/{name}.pt",
                              input=registry.default_input(f"efficientnet-lite:{index}", res), num_classes=1000)
    torch.save(registry.build(spec, load_weights=False).state_dict(), spec.weights)
    specs.append(spec)
rows = list(csv.DictReader(open(".data/sample/labels.csv")))
target = decode_target([s.input for s in specs])
logits = []
for spec in specs:
    model = inference.load(spec, "cuda")
    crops = [load_image(open(os.path.join(".data/sample", r["path"]), "rb").read(), spec.input, target=target)
             for r in rows]
    logits.append(inference.forward(model, spec, crops, device=torch.device("cuda")))
conf1 = committee.confidence(logits[0])
t1 = float(np.quantile(conf1, 1 - 0.940))           # 94.0 % exit at stage 1
rest = conf1 < t1
conf2 = committee.confidence((logits[0] + logits[1]) / 2)[rest]
t2 = float(np.quantile(conf2, 1 - 0.028 / 0.060)) if rest.any() else 1.0  # 2.8 % of all exit at stage 2
with open(".data/gpu.yaml", "w") as fh:
    fh.write("models:\n" + "".join(f"  {n}: {{arch: 'efficientnet-lite:{i}', weights: '.data/weights/{n}.pt', "
                                   f"resolution: {r}}}\n" for n, i, r in keys))
    fh.write(f"stages:\n  - {{model: l0, resolution: 224, batch_size: 256, threshold: {t1}}}\n"
             f"  - {{model: l1, resolution: 240, batch_size: 256, threshold: {t2}}}\n"
             "  - {model: l2, resolution: 260, batch_size: 256}\n")
with open(".data/gpu_lite2.yaml", "w") as fh:
    fh.write("models:\n  l2: {arch: 'efficientnet-lite:2', weights: '.data/weights/l2.pt', resolution: 260}\n"
             "stages:\n  - {model: l2, resolution: 260, batch_size: 256}\n")
print(open(".data/gpu.yaml").read())
PY

# 12,000 records (the carried images repeated), 8 worker processes sharing the GPU, one repeat: the GPU time left
# to a session is 15 minutes in all, start-up included
python3 benchmarks/throughput.py --device cuda --config .data/gpu.yaml --sample .data/sample --records 12000 \
    --repeats 1 --memory_base 0 --workers 8 --variants pipeline_cascade,pipeline_staged,pipeline_lite2 \
    2>&1 | tee "$OUT/throughput.txt"

# Issue 23: the same cascade and Lite2 alone over HTTP from benchmarks/remote_read.py's server on this machine's
# loopback (50 ms per request, then 200 ms) against the same images read locally; needs aiohttp among the wheels.
for cfg in gpu gpu_lite2; do
    python3 -m benchmarks.remote_read --config .data/$cfg.yaml --sample .data/sample --records 4000 device=cuda \
        2>&1 | tee "$OUT/remote_read_$cfg.txt"
done
