#!/usr/bin/env bash
# A refactor's proof of "behaviour unchanged": ten short configurations (every regime, the paper's
# ablation flags, a mixed math + chat batch, two torchrun ranks) run from two checkouts; their
# metrics.jsonl must match number for number but for timings and memory
# (bench/compare_metrics.py). CPU only: vLLM's GPU kernels depend on the batch.
#   git worktree add /tmp/before <commit>; ln -s $PWD/.venv /tmp/before/.venv
#   bash bench/same_metrics.sh /tmp/before /tmp/m/before; bash bench/same_metrics.sh . /tmp/m/after
#   .venv/bin/python bench/compare_metrics.py /tmp/m/before /tmp/m/after
# Issue 26's reshape: all ten identical (2026-12-02, 2 CPU cores, ~6 min a side).
# Issue 36's reshape (2026-12-05, 2 CPU cores, alongside the study): with --rename
# train/kl=train/kl_k1 (DPO) / train/kl_k3 (GRPO), offline, offline_mix_abl, online_nll, semi_s2,
# tr_online identical; online_mix (then --ref-sync per-task) identical to docs/fork.md's
# per_task_reference fork, and its --ref-sync yes run identical before and after; online_abl equal
# but train/loss (float rounding of the terms' sum, <= 1.7e-8 relative; gradients identical);
# grpo_math, tr_grpo equal but train/loss (<= 3.6e-7: pg and kl summed as separate terms;
# grad_norm and every other value identical); grpo_mix_abl (entropy + TIS + token norm) within
# 1e-5 relative but for the fp32 noise-floor gap (~1e-6) and a near-0 step-2 KL (2e-4 relative):
# its gradient differs by ~1e-7 relative (grad_norm), the same rounding moved into the weights.
set -u
cd "$1"; OUT=$2; mkdir -p "$OUT"
PY=.venv/bin/python
E="--num-steps 3 --eval-every 3 --eval-limit 16 --eval-samples 2 --save-every 100 --prompts-per-step 4"
MIX="--dataset embedded/data/math_train.jsonl,embedded/data/chat_train.jsonl --eval-dataset embedded/data/math_test.jsonl,embedded/data/chat_test.jsonl"
TR="-m torch.distributed.run --standalone --nproc_per_node 2"
run() { name=$1; shift; rm -rf "$OUT/$name"; echo "== $name $(date +%T)"; "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1; echo "rc=$?"; }
run grpo_math $PY grpo.py $E
run grpo_mix_abl $PY grpo.py $E $MIX --entropy-coef 1e-3 --tis-cap 2 --length-norm token
run online_abl $PY online_dpo.py $E --group-dpo --grpo-coef 0.01 --entropy-coef 1e-3 --length-norm sequence --micro-batch-size 4
run online_mix $PY online_dpo.py $E $MIX --ref-sync yes --micro-batch-size 4
run semi_s2 $PY semi_online_dpo.py $E --num-steps 4 --sync-interval 2 --ref-sync-interval 3
run offline $PY offline_dpo.py $E --group-dpo --grpo-coef 0.01
run offline_mix_abl $PY offline_dpo.py $E $MIX --entropy-coef 1e-3 --nll-scale 1
run online_nll $PY online_dpo.py $E --nll-scale 1 --no-nll-length-normalize --ref-sync no
run tr_online $PY $TR online_dpo.py $E --micro-batch-size 2
run tr_grpo $PY $TR grpo.py $E --micro-batch-size 6
