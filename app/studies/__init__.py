"""The measuring tools and the course's studies: each runs app.train (or plain Keras beside
it) and tables what it measured; the training core never imports them."""
