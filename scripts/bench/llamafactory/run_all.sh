#!/bin/bash
export PYTHONPATH=/work/wt16 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
cd /tmp/lfb
for run in lf_padded vt_padded lf_neat vt_packed; do
  s=$(date +%s.%N)
  if [[ $run == vt_* ]]; then
    /usr/bin/time -v timeout 900 /work/main/.venv/bin/python -m vlmtune.train $run.yaml > $run.log 2>&1
  else
    /usr/bin/time -v timeout 900 /work/venvs/llamafactory/bin/llamafactory-cli train $run.yaml > $run.log 2>&1
  fi
  e=$(date +%s.%N)
  echo "$run wall $(echo "$e - $s" | bc)" >> walls.txt
done
echo ALLDONE >> walls.txt
