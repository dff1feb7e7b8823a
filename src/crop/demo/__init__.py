"""crop demo."""
