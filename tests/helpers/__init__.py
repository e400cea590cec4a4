"""What the tests share, by what it helps with."""
