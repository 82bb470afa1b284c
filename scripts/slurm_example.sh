#!/bin/bash
# Example: train on 2 nodes x 8 GPUs = 16 ranks laid out as TP2 x PP2 x DP4 (EP2).
# Submit from the repository root:  sbatch scripts/slurm_example.sh
# Adjust the #SBATCH lines (partition, account, cores) and the data path to your cluster.
#SBATCH --job-name=moe-pretrain      # name shown by squeue
#SBATCH --nodes=2                    # two machines
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the node's 8 ranks
#SBATCH --gpus-per-node=8            # one GPU per rank
#SBATCH --cpus-per-task=64           # CPU cores for the 8 ranks of a node
#SBATCH --time=04:00:00              # wall-clock limit
#SBATCH --output=%x-%j.out           # log file: job name and job id

set -euo pipefail                                                   # stop at the first failing line
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # first node hosts the rendezvous
export OMP_NUM_THREADS=8                                            # 64 cores / 8 ranks, no oversubscription

launcher=(
  torchrun
  --nnodes "$SLURM_NNODES"           # 2 nodes
  --nproc-per-node 8                 # 8 ranks per node, one per GPU
  --rdzv-id "$SLURM_JOB_ID"          # the same id on both nodes: they join one job
  --rdzv-backend c10d                # torch's built-in rendezvous, no etcd needed
  --rdzv-endpoint "$head:29500"      # where the nodes meet (any free port on the head node)
)
train=(
  minimal_pretrain.py
  --tensor-parallel-size 2           # TP2: heads, FFN columns and vocab split over 2 GPUs of a node
  --pipeline-parallel-size 2         # PP2: layers 0-5 on stage 0, 6-11 on stage 1
  --num-microbatches 8               # micro-batches per step and DP rank (>= PP keeps the pipeline busy)
  --expert-parallel-size 2           # EP2 (the default: the TP size): each rank holds 4 of the 8 experts
  --micro-batch-size 4               # global batch = 4 x 8 micro-batches x DP4 = 128 sequences
  --seq-length 2048                  # tokens per sequence: 262,144 tokens per step
  --hidden-size 1024                 # the ~0.5B-parameter MoE of scripts/bench_train.py --preset moe-0.5b
  --num-layers 12
  --num-attention-heads 16
  --num-kv-heads 8
  --num-experts 8
  --num-experts-per-token 2
  --moe-ffn-hidden-size 1408
  --data data/mine                   # train.bin / val.bin / meta.json from scripts/prepare_data.py
  --max-steps 5000
  --lr 3e-4
  --min-lr 3e-5
  --warmup-steps 200
  --eval-interval 500                # validation loss every 500 steps
  --save "checkpoints/$SLURM_JOB_ID" # checkpoint folder
  --save-interval 500
  --metrics-file "metrics-$SLURM_JOB_ID.jsonl"
  --no-progress                      # no progress bar in a batch log
)
srun "${launcher[@]}" "${train[@]}"  # one torchrun per node (ntasks-per-node=1)
