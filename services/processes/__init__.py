"""The long-running processes of a conversation: one module (or package) per process."""
