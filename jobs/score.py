"""Ray job entrypoint: bulk-score an archive of cell images (same flags as `malaria-ray score`).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/score.py --input s3://slides/archive/ --model s3://models/run-1 \
        --output s3://slides/scores --actors 4 --gpus-per-actor 1 --skip-scored

Prints Ray Data progress bars while it runs, then a one-screen summary: images scored, error rows,
already-scored and non-image inputs skipped, the confusion matrix where labels are known,
images/s, and where predictions/, metrics.parquet, slides.parquet and runs/<run_id>/ were written.
Exit 0 when the run committed (error rows included); 2 with a one-line reason when it could not;
3 when it committed but its error rows exceeded --max-error-fraction; with --alarm-drift K, 4 when it
committed but its predicted-Parasitized rate left the band of the earlier nights, 5 when its error
rate did (docs/operations.md, "Drift band", lists every code).
Submitted, it joins the job's cluster (RAY_ADDRESS); run directly, it starts a local Ray and stops
it at the end (malaria_ray.runtime).
"""

import sys

from malaria_ray import cli

if __name__ == "__main__":
    sys.exit(cli.main(["score", *sys.argv[1:]]))
