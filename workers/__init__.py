"""The worker processes: model workers (`model`), the CPU ingestion worker (`ingest`), the page
search worker (`search`), the model backends they load (`backends`), and how each starts
(`start`)."""
