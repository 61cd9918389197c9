"""The ingestion worker: uploaded files into page and chunk batches on the model queues."""
