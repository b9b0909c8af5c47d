"""Using a trained model: fast inference paths, embedding at scale, export."""
