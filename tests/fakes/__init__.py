"""Local fakes of the chat platforms' APIs, served on 127.0.0.1 for the adapters' tests."""
