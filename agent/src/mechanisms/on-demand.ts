import path from 'node:path';
import { PROVISIONED, PROVISIONING_FAILED, userDataScript, type RecipeService } from '../core/recipe';
import { CloudletError } from '../errors';
import { buildConfigDrive } from '../images/config-drive';
import { createLinkedClone } from '../images/qemu-img';
import { waitForConsoleMarker } from '../vm/console-log';
import { buildDomainXml } from '../vm/domain-xml';
import type { Hypervisor } from '../vm/hypervisor';
import { instanceDomainSpec, instanceFiles } from '../vm/instance-domain';
import type { LaunchPlan, Mechanism } from '../core/mechanism';
import { faultPoint } from '../system/fault-points';

/**
 * On-Demand VM Provisioning: the Service VM is made at request time from a Base VM and a recipe. The instance runs on
 * a linked clone of the base disk, boots with the recipe as a cloud-init NoCloud config drive, and the launch ends
 * when the guest reports on its console that the provisioning finished (the registry then waits for readiness).
 */
export class OnDemandMechanism implements Mechanism<RecipeService> {
  readonly name = 'on-demand' as const;

  constructor(private readonly hypervisor: Hypervisor) {}

  get runtime(): Hypervisor {
    return this.hypervisor;
  }

  async launch({ service, domainName, record, timer, progress }: LaunchPlan<RecipeService>): Promise<'cold-boot'> {
    const files = instanceFiles(record.dir);
    progress('cloning');
    await createLinkedClone(path.join(service.dir, service.manifest.disk), files.disk, 'qcow2');
    await buildConfigDrive(files.configDrive, {
      userData: userDataScript(service.recipe),
      instanceId: record.id,
      hostname: service.id.replace(/[^A-Za-z0-9-]/g, '-'),
    });
    faultPoint('on-demand:after-cidata');
    progress('booting');
    const spec = { ...instanceDomainSpec(service, domainName, record, this.hypervisor.domainType), cdrom: files.configDrive };
    await timer.time('libvirt', () => this.hypervisor.boot(buildDomainXml(spec)));
    progress('provisioning');
    faultPoint('on-demand:first-boot');
    // The recipe's readiness timeout bounds the whole launch, provisioning included.
    const deadline = Date.parse(record.createdAt) + record.readiness.timeout_ms;
    const outcome = await timer.time('guest', () =>
      waitForConsoleMarker(files.consoleLog, [PROVISIONED, PROVISIONING_FAILED], deadline, async () => (await this.hypervisor.running()).has(record.id)),
    );
    if (outcome === PROVISIONED) return 'cold-boot';
    const what =
      outcome === PROVISIONING_FAILED
        ? 'failed in the guest'
        : Date.now() >= deadline
          ? `did not finish within ${record.readiness.timeout_ms} ms`
          : 'ended with the VM stopping';
    throw new CloudletError('PROVISIONING_FAILED', `provisioning ${service.id} from base ${service.base.name} ${what}`, { details: { recipe_id: service.id } });
  }
}
