"""Load a saved IPD model and run it in a plain Gymnasium loop (Stable-Baselines3-style predict).

    python examples/deploy_loop.py out/quickstart/ipd.d3 --env InvertedPendulum-v5 --episodes 3

No target return is needed: the policy sets every return token to the learned V(s).
"""
import argparse

import numpy as np
import torch

from ipd_agent import IPDPolicy
from ipd_agent.collect import make_env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="file written by IPD.save / `ipd-agent fit`")
    p.add_argument("--env", default="InvertedPendulum-v5", help="Gymnasium env id (actions rescaled to [-1, 1])")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)

    env = make_env(args.env)
    policy = IPDPolicy.load(args.model, env.action_space)
    returns = []
    for ep in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + ep)
        episode_start, done, ret = True, False, 0.0
        while not done:
            action, _ = policy.predict(obs, episode_start=episode_start, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            ret += float(reward)
            episode_start, done = False, terminated or truncated
        returns.append(ret)
        print(f"episode {ep}: return {ret:.1f}")
    print(f"mean return {np.mean(returns):.1f} ± {np.std(returns):.1f}")


if __name__ == "__main__":
    main()
