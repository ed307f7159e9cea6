"""The reference's entry name, kept so its commands run unchanged: the same job as train.py."""
from train import main

if __name__ == "__main__":
    main()
