"""What the API and the workers share.

The root holds the shared vocabulary: settings, the served models (registry), errors, Redis key
names, vectors on the wire, the task contract (names, queues, arguments) and the direct-submission
client. The packages hold one mechanism each: `delivery` (the Celery app, heartbeats, lost-task
recovery), `jobs` (job state, the ledger of a job's tasks, units, events), `inputs` (images,
documents, text checks), `store` (Milvus and its change feed) and `launch` (starting processes).

Nothing here imports `api` or `workers` (tests/test_layering.py); `launch` names the processes it
starts by their import strings.
"""
