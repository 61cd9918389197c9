"""What clients send, checked and decoded: images, uploaded documents, text inputs. Limits come in
as arguments; nothing here reads settings."""
