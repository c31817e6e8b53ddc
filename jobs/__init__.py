"""Job recipes: each a LightningModule + LightningDataModule and a YAML spec beside it."""
