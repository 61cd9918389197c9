"""The embedding cache: one input's vectors, kept in a Redis of its own under a key that says
everything that made them (`entries`), and read and written by the API for online requests and by
the model workers for pages and chunks (`client`)."""
