#!/usr/bin/env bash
# One-command GPU acceptance run (issue #13), about 10 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (the device tool's folder) or ./gpu_check
#   STEPS="fdr step_time" bash benchmarks/gpu_check.sh   # a subset
#   # the fdr step scaled down on a CPU (a smoke test of this script)
#   TRAINER=cpu STEPS=fdr EXTRA="model.encoder.depths=[1,1,1,1] benchmark.crop_size=64 ..." \
#       bash benchmarks/gpu_check.sh
#
# Steps (each writes <step>.log / <step>.md under the output folder, and goes on if one fails):
#   fdr        a real Trainer fast_dev_run of experiment=mic_gaussian at full size (MiT-B5, 1024
#              crops, HRDA + MIC + Gaussian MPCL) on CUDA in bf16, on fake GTA / Cityscapes trees
#              in their official layouts (tests/fake_trees.py), no pretrained weights
#   step_time  benchmarks/step_time.py for {daformer,hrda,mic}_{baseline,centroid,gaussian}
#   anchors    benchmarks/anchors.py: MiT-B5 + DAFormer head vs timm pvt_v2_b5 vs transformers
#              SegFormer-B5, forward + backward, batch 2, 1024^2, bf16
#   ddp        where two GPUs exist: 20 steps of trainer=ddp (2 GPUs x batch 1)
#
# On the project's GPU machine (no network) install the missing wheels first, as
# ../shared/gpu-wheels/README.md says, with .whl carried along.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD/tests:$PWD/src:${PYTHONPATH:-}"
steps=${STEPS:-"fdr step_time anchors ddp"}
data="$out/data"
status=0

run() {  # run <name> <command...>: log to $out/<name>.log, record the exit code
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$out/device.txt"

python - "$data" <<'EOF'
import sys
from pathlib import Path

from fake_trees import make_cityscapes, make_gta
from mpcl.prepare import prepare

root = Path(sys.argv[1])
if not (root / "cityscapes").is_dir():
    make_gta(root / "gta", n=8)
    make_cityscapes(root / "cityscapes", per_city=4)
    prepare("gta", root / "gta")
    prepare("cityscapes", root / "cityscapes")
EOF

trainer=${TRAINER:-gpu}
read -r -a extra <<<"${EXTRA:-}"
common=(paths.data_dir="$data" paths.log_dir="$out/logs" model.encoder.pretrained=null
    data.num_workers=4 "${extra[@]}")
for step in $steps; do
    case $step in
    fdr)
        run fdr python -m mpcl.train experiment=mic_gaussian debug=fdr trainer="$trainer" "${common[@]}" ;;
    step_time)
        run step_time python benchmarks/step_time.py --iters 20 --warmup 5 --experiments \
            daformer_baseline daformer_centroid daformer_gaussian \
            hrda_baseline hrda_centroid hrda_gaussian mic_baseline mic_centroid mic_gaussian
        grep '^|\|^device' "$out/step_time.log" >"$out/step_time.md" ;;
    anchors)
        run anchors python benchmarks/anchors.py --size 1024 --iters 20 --warmup 5
        grep '^|\|^device' "$out/anchors.log" >"$out/anchors.md" ;;
    ddp)
        gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
        if [ "$gpus" -ge 2 ]; then
            run ddp python -m mpcl.train experiment=mic_gaussian trainer=ddp trainer.devices=2 \
                data.batch_size=1 trainer.max_steps=20 trainer.val_check_interval=20 \
                evaluate=false logger=null "${common[@]}"
        else
            echo "== ddp: skipped, $gpus GPU(s)" | tee -a "$out/summary.txt"
        fi ;;
    *)
        echo "unknown step '$step' (steps: fdr step_time anchors ddp)" >&2
        exit 2 ;;
    esac
done
exit $status
