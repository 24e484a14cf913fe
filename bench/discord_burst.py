"""A burst of /imagine: many members at once against the fake Discord, through the real EaselClient.

Every member sends one /imagine in the same instant; the generator takes 2 s per image. Prints
the time to acknowledge (from the interaction's dispatch to the arrival of the bot's callback) as
p50/p99/max, how many interactions were acknowledged, how many results were posted (job done and
the original response edited with the image), and the wall time. Targets: p99 acknowledgement
under 300 ms, none lost, every result posted.

    python bench/discord_burst.py [--members 200] [--delay 2.0] [--slots 50]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

from bot.config import settings_from_dict
from bot.discord.client import EaselClient
from moderation import NoImageScreen
from tests.fakes.discord_server import FakeDiscord, FakeInteraction
from tests.fakes.generators import PreparedGenerator, png_bytes
from tests.helpers import start_app

ACK_TARGET_S = 0.300


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def posted(fake: FakeDiscord, interaction: FakeInteraction) -> bool:
    try:
        message = fake.message(interaction.original_message_id or 0)
    except LookupError:
        return False
    return bool(message.attachments)


async def run(members: int, delay_s: float, slots: int, timeout_s: float) -> bool:
    # A few prepared images, made before the clock starts: making a PNG per job would put the
    # stand-in generator's own CPU time on the event loop the bot shares with the fake.
    images = [png_bytes(512, 512, seed) for seed in range(4)]
    generator = PreparedGenerator(delay_s=delay_s, script=[images[i % 4] for i in range(members)])
    async with FakeDiscord() as fake:
        users = [fake.add_user(f"member{i}") for i in range(members)]
        for user in users:
            fake.add_member(fake.guild, user)
        with fake.patch_discord_py(), tempfile.TemporaryDirectory() as tmp:
            settings = settings_from_dict({
                "storage": {"database": f"{tmp}/easel.db", "images_dir": f"{tmp}/images"},
                "generation": {"default_model": "fake-model"},
            })
            app = start_app(settings, generators=[generator], image_screen=NoImageScreen(),
                            queue_limits={"fake": slots})
            client = EaselClient(app, app.settings.discord, guild_ready_timeout=0.05)
            await client.login(fake.token)
            runner = asyncio.create_task(client.connect(reconnect=False))
            await asyncio.wait_for(client.wait_until_ready(), 10)
            print(f"{members} members, generator {delay_s:g} s per image, "
                  f"queue limit for 'fake': {slots} concurrent")

            started = time.monotonic()
            interactions = await asyncio.gather(*[
                fake.send_slash_command("imagine", {"prompt": f"a lighthouse number {i}"}, user=user)
                for i, user in enumerate(users)])
            deadline = started + timeout_s
            while time.monotonic() < deadline and not all(posted(fake, i) for i in interactions):
                await asyncio.sleep(0.05)
            wall = time.monotonic() - started

            sending = max(i.sent_at for i in interactions) - min(i.sent_at for i in interactions)
            acked = [i for i in interactions if i.callback is not None and i.callback.status == 200]
            latencies = [i.ack_latency for i in acked]
            results = sum(posted(fake, i) for i in interactions)
            done = sum(job.status == "done" for job in app.jobs.list(limit=members * 2))
            await client.delivery.shutdown(grace_s=0)
            await client.close()
            await asyncio.gather(runner, return_exceptions=True)
            await app.close()

    # The fake runs on the bot's event loop: its sending of the burst is part of the latency.
    print(f"the fake dispatched the {members} interactions within {sending * 1000:.1f} ms")
    print(f"acknowledged: {len(acked)}/{members}")
    if latencies:
        print(f"time to acknowledge: min {min(latencies) * 1000:.1f} ms, "
              f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms "
              f"(target: p99 < {ACK_TARGET_S * 1000:.0f} ms)")
    print(f"results posted: {results}/{members} (jobs done: {done})")
    print(f"wall time: {wall:.2f} s (the generator alone needs at least "
          f"{delay_s * -(-members // slots):.1f} s with {slots} slots)")
    met = (len(acked) == members and results == members and done == members
           and bool(latencies) and percentile(latencies, 0.99) < ACK_TARGET_S)
    print("targets met" if met else "TARGETS MISSED")
    return met


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds the generator takes per image")
    parser.add_argument("--slots", type=int, default=50, help="queue limit for the generator")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    sys.exit(0 if asyncio.run(run(args.members, args.delay, args.slots, args.timeout)) else 1)


if __name__ == "__main__":
    main()
