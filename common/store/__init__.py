"""The vector store: embedq's collections in Milvus, and the feed of page changes that search
workers follow."""
