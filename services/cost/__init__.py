"""Cost accountant: prices every inference event against a versioned price book."""
