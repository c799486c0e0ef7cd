#!/usr/bin/env python3
"""Chaos run: thousands of events through several worker processes while workers are killed
with SIGKILL (six times), RabbitMQ is restarted and Postgres is restarted, with the stand-in
CRM failing a fraction of calls. At the end it checks that every expected contact exists
exactly once (zero duplicate records per provider), that every failure is in the dead-letter
queue, and that everything settled within two minutes of the last fault, and prints the
figures.

    ops/chaos.py --events 2000             # what CI runs
    ops/chaos.py --events 50000 --release  # a long run

Needs: a local RabbitMQ and PostgreSQL that this script may restart (it runs
`rabbitmqctl shutdown` / `rabbitmq-server -detached` and `pg_ctlcluster ... restart`), cargo,
and the rights to do both (CI runs it as root). Everything it creates is named
chaos.<tag>.* / appevents_chaos_<tag> and removed at the end.

Each event runs two workflows: a Salesforce create of a Contact with `match_fields` ["Email"]
(after a crash, the record an earlier attempt made is looked up before creating another) and
a HubSpot create-contact (409 becomes an update). A fraction of events carry an email HubSpot refuses
(a permanent error: those HubSpot runs must end in the dead-letter queue, their Salesforce runs
must succeed), and a fraction of messages are malformed (dead-lettered as invalid).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENT = "Contact Created"
# A key for this run only; chaos data is dropped at the end.
CHAOS_KEY = "Y2hhb3MtY2hhb3MtY2hhb3MtY2hhb3MtY2hhb3MhISE="


def log(message):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="valid events to publish")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--fail-rate", type=float, default=0.2, help="fraction of CRM calls answered 503")
    parser.add_argument("--bad-email-rate", type=float, default=0.02, help="fraction of events HubSpot refuses")
    parser.add_argument("--malformed", type=int, default=None, help="malformed messages (default: 1%% of events)")
    parser.add_argument("--latency-ms", type=int, default=20, help="stand-in CRM latency per call")
    parser.add_argument("--release", action="store_true", help="build and run the release binaries")
    parser.add_argument("--timeout", type=int, default=900, help="seconds to wait for everything to settle")
    parser.add_argument("--settle-limit", type=int, default=120, help="seconds after the last fault by which everything must have settled")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument("--no-database-restart", action="store_true")
    parser.add_argument("--database-url", default=os.environ.get("CHAOS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432"))
    parser.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    return parser.parse_args()


class Chaos:
    def __init__(self, args):
        self.args = args
        self.tag = uuid.uuid4().hex[:8]
        self.workdir = tempfile.mkdtemp(prefix=f"appevents-chaos-{self.tag}-")
        profile = "release" if args.release else "debug"
        self.bin = os.path.join(ROOT, "target", profile, "appevents")
        self.standin_bin = os.path.join(ROOT, "target", profile, "appevents-standin")
        self.database = f"appevents_chaos_{self.tag}"
        self.queue = f"chaos.{self.tag}.work"
        self.dead = f"chaos.{self.tag}.dead"
        self.env = dict(os.environ)
        self.env.update({
            "APPEVENTS_ENVIRONMENT": "chaos",
            "DATABASE_URL": f"{args.database_url}/{self.database}",
            "AMQP_URL": args.amqp_url,
            "APPEVENTS__AMQP__EXCHANGE": f"chaos.{self.tag}.events",
            "APPEVENTS__AMQP__QUEUE": self.queue,
            "APPEVENTS__AMQP__DEAD_LETTER_QUEUE": self.dead,
            "APPEVENTS__AMQP__PREFETCH": "64",
            "APPEVENTS__WORKER__CONCURRENCY": "16",
            "APPEVENTS__WORKER__OPS_LISTEN": "127.0.0.1:0",
            "APPEVENTS__WORKER__SHUTDOWN_GRACE": "5s",
            "APPEVENTS__RETRY__SCHEDULE": "1s,2s,4s,8s",
            "APPEVENTS__RETRY__RATE_LIMITED_MIN_DELAY": "1s",
            "APPEVENTS__HTTP__TIMEOUT": "5s",
            "APPEVENTS__SECRETS__ACTIVE_KEY": "chaos",
            "APPEVENTS__SECRETS__KEYS__CHAOS": CHAOS_KEY,
            "APPEVENTS__LOG__FORMAT": "json",
            "RUST_LOG": "warn",
        })
        self.workers = []
        self.standin = None
        self.actions = Counter()
        self.last_fault = None
        self.stop_chaos = threading.Event()

    # -- processes -----------------------------------------------------------------------

    def cli(self, *args, input_text=None):
        result = subprocess.run([self.bin, *args], env=self.env, input=input_text, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"appevents {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def start_worker(self, slot):
        logfile = open(os.path.join(self.workdir, f"worker-{slot}.log"), "a")
        process = subprocess.Popen([self.bin, "worker"], env=self.env, stdout=logfile, stderr=logfile)
        if slot < len(self.workers):
            self.workers[slot] = process
        else:
            self.workers.append(process)

    def build(self):
        command = ["cargo", "build", "--quiet", "--bin", "appevents", "--bin", "appevents-standin"]
        if self.args.release:
            command.append("--release")
        log("building: " + " ".join(command))
        subprocess.run(command, cwd=ROOT, check=True)

    def start_standin(self):
        port = free_port()
        self.standin_url = f"http://127.0.0.1:{port}"
        logfile = open(os.path.join(self.workdir, "standin.log"), "w")
        self.standin = subprocess.Popen([self.standin_bin, "--listen", f"127.0.0.1:{port}"], stdout=logfile, stderr=logfile)
        wait_until(lambda: http_ok(f"{self.standin_url}/_standin/requests"), 10, "stand-in CRM up")
        http_post(f"{self.standin_url}/_standin/faults", {"fail_rate": self.args.fail_rate, "fail_status": 503, "latency_ms": self.args.latency_ms})

    # -- setup ---------------------------------------------------------------------------

    def define(self):
        self.cli("migrate")
        self.cli("app-event", "create", "--name", EVENT, "--schema", json.dumps({"email": "ada@example.com", "last_name": "Lovelace"}))
        self.salesforce = self.cli(
            "workflow", "create", "--name", "chaos salesforce", "--event", EVENT, "--provider", "salesforce",
            "--action", "create", "--sobject", "Contact", "--match-field", "Email",
            "--mapping", json.dumps({"Email": "{{payload.email}}", "LastName": "{{payload.last_name}}"}))
        self.hubspot = self.cli(
            "workflow", "create", "--name", "chaos hubspot", "--event", EVENT, "--provider", "hubspot",
            "--action", "create-contact", "--mapping", json.dumps({"email": "{{payload.email}}", "lastname": "{{payload.last_name}}"}))
        self.users = [f"chaos-user-{n}" for n in range(self.args.users)]
        for user in self.users:
            for provider, workflow in (("salesforce", self.salesforce), ("hubspot", self.hubspot)):
                connection = self.cli("connection", "create", "--user", user, "--provider", provider,
                                      "--base-url", self.standin_url, "--access-token", f"token-{user}")
                self.cli("subscription", "create", "--user", user, "--workflow", workflow, "--connection", connection)

    def write_events(self):
        rng = random.Random(self.tag)
        self.events = {}
        path = os.path.join(self.workdir, "events.ndjson")
        with open(path, "w") as out:
            for n in range(self.args.events):
                event_id = f"chaos-{self.tag}-{n}"
                bad = rng.random() < self.args.bad_email_rate
                email = f"c{n}-no-at-sign.{self.tag}" if bad else f"c{n}.{self.tag}@chaos.test"
                self.events[event_id] = {"email": email, "bad": bad}
                line = {"id": event_id, "name": EVENT, "user_id": rng.choice(self.users), "payload": {"email": email, "last_name": f"L{n}"}}
                out.write(json.dumps(line) + "\n")
        malformed = self.args.malformed if self.args.malformed is not None else max(1, self.args.events // 100)
        self.malformed = malformed
        bad_path = os.path.join(self.workdir, "malformed.ndjson")
        shapes = ['{"name": "Contact Created", "user_id": "x", "payload": "not an object", "marker": "%s"}',
                  '{"user_id": "x", "payload": {}, "marker": "%s"}',
                  '["an array", "%s"]',
                  '{"name": "", "user_id": "x", "payload": {}, "marker": "%s"}']
        with open(bad_path, "w") as out:
            for n in range(malformed):
                out.write(shapes[n % len(shapes)] % f"{self.tag}-{n}" + "\n")
        return path, bad_path

    # -- chaos ---------------------------------------------------------------------------

    def chaos(self):
        """Kills workers, restarts the broker and the database, while events flow."""
        steps = [("kill worker", 1), ("kill worker", 3), ("restart broker", 5), ("kill worker", 7), ("kill worker", 9),
                 ("restart database", 11), ("kill worker", 13), ("kill worker", 15)]
        if self.args.no_broker_restart:
            steps = [s for s in steps if s[0] != "restart broker"]
        if self.args.no_database_restart:
            steps = [s for s in steps if s[0] != "restart database"]
        start = time.monotonic()
        for action, at in steps:
            while time.monotonic() - start < at:
                if self.stop_chaos.wait(0.1):
                    return
            try:
                getattr(self, action.replace(" ", "_"))()
                self.actions[action] += 1
                self.last_fault = time.monotonic()
            except Exception as error:  # a failed chaos step is reported, not fatal
                log(f"{action} failed: {error}")

    def kill_worker(self):
        slot = random.randrange(len(self.workers))
        log(f"SIGKILL worker {slot} (pid {self.workers[slot].pid})")
        self.workers[slot].send_signal(signal.SIGKILL)
        self.workers[slot].wait()
        time.sleep(1)
        self.start_worker(slot)

    def restart_broker(self):
        log("restarting RabbitMQ")
        subprocess.run(["rabbitmqctl", "-q", "shutdown"], check=True, capture_output=True)
        subprocess.run(["rabbitmq-server", "-detached"], check=True, capture_output=True)
        # The node takes a moment to exist before await_startup can ask it anything.
        wait_until(lambda: subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", "5"], capture_output=True).returncode == 0,
                   120, "RabbitMQ started")
        log("RabbitMQ is back")

    def restart_database(self):
        version = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])[-1]
        log(f"restarting PostgreSQL {version}")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True, capture_output=True)
        log("PostgreSQL is back")

    # -- checks --------------------------------------------------------------------------

    def sql(self, query):
        result = subprocess.run(["psql", f"{self.args.database_url}/{self.database}", "-Atqc", query], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return result.stdout.strip()

    def settled(self):
        expected = 2 * len(self.events)
        try:
            finished = int(self.sql("select count(*) from runs where status in ('succeeded', 'dead')"))
        except RuntimeError:
            return False
        depth = queue_depth(self.queue)
        return finished >= expected and depth == 0

    def verify(self):
        records = json.loads(urllib.request.urlopen(f"{self.standin_url}/_standin/records").read())
        salesforce = Counter(r["fields"].get("Email") for r in records if r["provider"] == "salesforce")
        hubspot = Counter(r["fields"].get("email") for r in records if r["provider"] == "hubspot")
        creates = Counter((r["provider"], r["creates"]) for r in records)
        letters = json.loads(self.cli("dlq", "list", "--json", "--limit", "10000000"))["letters"]
        dead_for = Counter((l.get("event_id"), l.get("workflow_id")) for l in letters if l.get("workflow_id"))
        invalid = [l for l in letters if l["reason_code"] == "invalid" and self.tag in l["body"]]
        runs = dict(((event, workflow), status) for event, workflow, status in
                    (line.split("|") for line in self.sql("select event_id, workflow_id, status from runs").splitlines()))

        problems = []
        for event_id, event in self.events.items():
            if salesforce[event["email"]] != 1:
                problems.append(f"{event_id}: {salesforce[event['email']]} Salesforce contacts")
            if runs.get((event_id, self.salesforce)) != "succeeded":
                problems.append(f"{event_id}: Salesforce run {runs.get((event_id, self.salesforce))}")
            if event["bad"]:
                if hubspot[event["email"]] != 0:
                    problems.append(f"{event_id}: refused email has a HubSpot contact")
                if dead_for[(event_id, self.hubspot)] < 1:
                    problems.append(f"{event_id}: HubSpot failure missing from the dead-letter queue")
                if runs.get((event_id, self.hubspot)) != "dead":
                    problems.append(f"{event_id}: HubSpot run {runs.get((event_id, self.hubspot))}, expected dead")
            else:
                # A valid event either made its contact exactly once, or (retries exhausted by
                # the injected failures) is in the dead-letter queue; never both, never neither.
                made, lettered = hubspot[event["email"]], dead_for[(event_id, self.hubspot)]
                if not ((made == 1 and lettered == 0) or (made == 0 and lettered >= 1)):
                    problems.append(f"{event_id}: {made} HubSpot contacts and {lettered} dead letters")
        if self.settle_seconds > self.args.settle_limit:
            problems.append(f"settled {self.settle_seconds:.1f}s after the last fault, more than {self.args.settle_limit}s")
        if len(invalid) < self.malformed:
            problems.append(f"{self.malformed} malformed messages published, {len(invalid)} dead-lettered as invalid")
        for record in records:
            if record["creates"] != 1:
                problems.append(f"{record['provider']} record {record['id']} created {record['creates']} times")

        requests = json.loads(urllib.request.urlopen(f"{self.standin_url}/_standin/requests").read())
        statuses = Counter(r["status"] for r in requests)
        good = sum(1 for e in self.events.values() if not e["bad"])
        print()
        print("chaos run")
        print(f"  events published            {len(self.events)} valid, {self.malformed} malformed")
        print(f"  workers                     {self.args.workers}")
        print(f"  chaos                       " + ", ".join(f"{n}x {a}" for a, n in sorted(self.actions.items())))
        print(f"  CRM calls                   {len(requests)} ({', '.join(f'{s}: {n}' for s, n in sorted(statuses.items()))})")
        print(f"  Salesforce contacts         {sum(1 for c in salesforce.values() if c)} for {len(self.events)} events (expected {len(self.events)}, each once)")
        print(f"  duplicate records           Salesforce {sum(c - 1 for c in salesforce.values() if c > 1)}, HubSpot {sum(c - 1 for c in hubspot.values() if c > 1)}")
        print(f"  settled after last fault    {self.settle_seconds:.1f}s (limit {self.args.settle_limit}s)")
        print(f"  HubSpot contacts            {sum(1 for e in self.events.values() if hubspot[e['email']])} for {good} valid emails")
        print(f"  records created twice       {sum(1 for r in records if r['creates'] != 1)}")
        print(f"  dead letters                {len(letters)}: {dict(Counter(l['reason_code'] for l in letters))}")
        print(f"  runs                        {dict(Counter(runs.values()))}")
        if problems:
            print(f"\nFAILED: {len(problems)} problem(s)")
            for problem in problems[:50]:
                print(f"  {problem}")
            return False
        print("\nOK: every expected contact exists exactly once; every failure is in the dead-letter queue")
        return True

    # -- lifecycle -----------------------------------------------------------------------

    def run(self):
        self.build()
        self.start_standin()
        self.define()
        events, malformed = self.write_events()
        for slot in range(self.args.workers):
            self.start_worker(slot)
        log(f"{self.args.workers} workers started; publishing {len(self.events)} events and {self.malformed} malformed messages")
        chaos = threading.Thread(target=self.chaos, daemon=True)
        chaos.start()
        publisher_log = open(os.path.join(self.workdir, "publish.log"), "w")
        publisher = subprocess.Popen([self.bin, "publish", "--file", events], env=self.env, stdout=subprocess.DEVNULL, stderr=publisher_log)
        subprocess.run([self.bin, "publish", "--file", malformed, "--unchecked"], env=self.env, check=True, capture_output=True)
        if publisher.wait() != 0:
            raise RuntimeError(f"publishing failed; see {publisher_log.name}")
        log("all events published and confirmed")
        chaos.join()
        for slot, worker in enumerate(self.workers):
            if worker.poll() is not None:
                log(f"worker {slot} had exited ({worker.returncode}); restarting it")
                self.start_worker(slot)
        wait_until(self.settled, self.args.timeout, "every run finished and the queues drained")
        self.settle_seconds = time.monotonic() - (self.last_fault or time.monotonic())
        return self.verify()

    def cleanup(self):
        self.stop_chaos.set()
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        if self.standin and self.standin.poll() is None:
            self.standin.terminate()
        for queue in [self.queue, self.dead, f"{self.queue}.held"] + [f"{self.queue}.retry.{d}" for d in ("1s", "2s", "4s", "8s")]:
            subprocess.run(["rabbitmqctl", "-q", "delete_queue", queue], capture_output=True)
        subprocess.run(["psql", f"{self.args.database_url}/postgres", "-qc", f'drop database if exists "{self.database}" with (force)'], capture_output=True)
        log(f"logs kept in {self.workdir}")


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url):
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def http_post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=5)


def queue_depth(name):
    result = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages", "--no-table-headers"], capture_output=True, text=True)
    total = 0
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and (parts[0] in (name, name + ".held") or parts[0].startswith(name + ".retry.")):
            total += int(parts[1])
    return total if result.returncode == 0 else -1


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {seconds}s waiting for: {what}")


def main():
    args = parse_args()
    chaos = Chaos(args)
    ok = False
    try:
        ok = chaos.run()
    except Exception as error:
        log(f"error: {error}")
    finally:
        chaos.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
